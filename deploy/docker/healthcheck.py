"""Container HEALTHCHECK: exit 0 only when the service answers 200 on /readyz.

Standard library only (the image has no curl). The port comes from ISOMAX_PORT, as the
service's own settings do; the reason for a failure is printed, and `docker inspect` shows it.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("ISOMAX_PORT", "8000")
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as e:  # 503 while loading, or when a model cannot be served
        print(f"{url}: {e.code} {e.read(500).decode(errors='replace')}", file=sys.stderr)
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
