import sys

from chaid.cli import main

sys.exit(main())
