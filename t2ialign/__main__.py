import sys

from t2ialign.cli import main

sys.exit(main())
