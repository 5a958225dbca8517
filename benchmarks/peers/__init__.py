"""Other systems measured beside ours on the same data and protocol.

Their libraries are the optional `peers` extra of setup.py (`pip install -e
'.[peers]'`); distill_jax never imports them, and each script here imports
them only inside the functions that need them, so the scripts' data
conversion imports (and is tested) without them.
"""
