import sys

from chaid_lab.cli import main

sys.exit(main())
