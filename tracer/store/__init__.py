"""Ledger and table files: Parquet, CSV or JSON lines (files)."""
