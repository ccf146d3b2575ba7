"""Test and documentation helpers that ship with the engine (no test framework imported here).

Modules: `janus_pro_format` (an offline directory in the format of `deepseek-community/Janus-Pro-1B`
with tiny random weights).
"""
