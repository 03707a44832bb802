import sys

from .planner import main

sys.exit(main())
