"""Triton kernel templates for the ShadowKV ops (installed as ``shadowpass.templates``).

Not written yet (issue 4); see ``shadowpass.lowering``.
"""
