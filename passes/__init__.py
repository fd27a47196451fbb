"""Passes: functions IR -> IR (plus a report), one file per idea; none touches a file format."""
