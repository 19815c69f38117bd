from zokern.cli import main

raise SystemExit(main())
