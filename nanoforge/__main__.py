import sys

from nanoforge.cli import main

sys.exit(main())
