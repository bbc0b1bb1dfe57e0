"""The REST front-end (FastAPI). Never imports torch: estimates and admission use core.accounting only."""
