"""Persistence shared by the API and the workers: SQLAlchemy models, sessions, ledger, storage. No FastAPI, no torch."""
