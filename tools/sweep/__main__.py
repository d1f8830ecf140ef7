import sys

from tools.sweep.sweep import main

sys.exit(main())
