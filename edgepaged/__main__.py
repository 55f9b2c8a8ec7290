"""`python -m edgepaged`: the `edgepaged` command, for the systemd unit, which runs the venv's
interpreter rather than a console script tied to where the venv was built."""

from edgepaged.cli import main

main()
