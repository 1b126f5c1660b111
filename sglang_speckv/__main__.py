import sys

from sglang_speckv.cli import main

sys.exit(main())
