from b0_pm.cli import main

raise SystemExit(main())
