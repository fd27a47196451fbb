"""Exporters: lower the IR to a runtime's file format, streaming, refusing what is inexact."""
