"""The daemon: listeners, connections, msgpack-rpc dispatch, access control, sd_notify.

Import-light: ``chaid.server.cli`` registers ``chaid serve`` without importing trio, torch
or the store; :mod:`chaid.server.daemon` is the entry point that does.
"""
