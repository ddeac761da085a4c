"""What the tests share that is not a fixture: repository paths and helper modules (``support.*``)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
