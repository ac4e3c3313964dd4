import sys

from sigclassd.cli import main

sys.exit(main())
