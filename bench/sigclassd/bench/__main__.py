import sys

from sigclassd.bench.cli import main

sys.exit(main())
