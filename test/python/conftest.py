import os
import sys
import warnings

# test/ holds the shared model zoo (models.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=FutureWarning)
