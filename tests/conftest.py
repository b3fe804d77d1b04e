import sys
from pathlib import Path

# Recorded runs name their module class by import path; make `models` importable by that path.
sys.path.insert(0, str(Path(__file__).parent))
