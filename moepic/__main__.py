import sys

from moepic.cli import main

sys.exit(main())
