from isomax.cli import main

raise SystemExit(main())
