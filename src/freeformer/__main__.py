import sys

from freeformer.cli import main

sys.exit(main())
