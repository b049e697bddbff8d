"""The Streamlit dashboard over a folder of runs: ``flatlora app [RUNS_DIR]`` (or ``streamlit run app/main.py``)."""
