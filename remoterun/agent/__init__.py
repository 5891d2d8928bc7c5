"""The executing host's side of remoterun: stdlib and cloudpickle only.

These files are shipped as source to remote hosts and run there unchanged with
``python -m remoterun.agent``; nothing here may import paramiko, fsspec or the
rest of remoterun.
"""
