import sys

from deployq.cli import main

sys.exit(main())
