import sys

from cosyvoiced.daemon import main

sys.exit(main())
