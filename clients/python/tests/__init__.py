"""The client distribution's own tests.

A package, so that its conftest and helpers stay apart from the repository's tests/.
"""
