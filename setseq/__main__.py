import sys

from setseq.cli import main

sys.exit(main())
