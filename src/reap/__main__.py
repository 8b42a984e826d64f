from reap.cli import reap

reap()
