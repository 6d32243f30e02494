import sys

from avdiag.cli import main

sys.exit(main())
