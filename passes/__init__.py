"""Passes: IR -> IR rewrites behind one contract (passes/base.py), one file per idea.

A pass never touches a file format; what a target can hold reaches it through the options the
job derives from the target (e.g. whether EEP's router map may stay exact). Measurements the
passes decide from (calibration, fitness, search, baselines' statistics, similarities) live in
`moecompile.analysis`.
"""
