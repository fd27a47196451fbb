"""Where a job's calibration work runs: in this process, or spread over Ray workers.

A pass hands its independent pieces of work to the job's engine (`PassContext.engine`):
candidates of a search to score (`Engine.candidates`) and token shards of a calibration pass
(`Engine.map`). `engine.py` holds the interface and the in-process engine, `ray_engine.py`
the Ray one (imported only with `--ray`; the core never needs Ray), `connect.py` which of them
a job gets, `address.py` what `--ray ADDRESS` may say. shared/research/scale.md §4 and §6.12 explain the design.
"""
