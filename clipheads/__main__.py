import sys

from clipheads.cli import main

sys.exit(main())
