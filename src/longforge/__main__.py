"""Allow `python -m longforge`."""

from longforge.cli import main

main()
