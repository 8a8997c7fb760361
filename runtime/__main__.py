import sys

from difuse.runtime.cli import main

sys.exit(main())
