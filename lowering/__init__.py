"""Inductor lowerings for the ShadowKV ops (installed as ``shadowpass.lowering``).

Not written yet (issue 4): every platform runs the plain-PyTorch reference ops in
``shadowpass.reference``, which Inductor calls as opaque custom ops.
"""
