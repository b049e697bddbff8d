"""The Streamlit dashboard (``streamlit run app/main.py``), filled by the dashboard issue."""
