import sys

from acgraph.cli import main

sys.exit(main())
