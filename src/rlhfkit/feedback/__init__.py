"""Human (and simulated) feedback: the judgments store, the service layer every client goes through (web pages,
simulated annotators, CLI), agreement metrics and export to the preference formats the trainers read.

Needs the `web` extra (`pip install 'rlhfkit[web]'`): SQLAlchemy, alembic and, for the web app, FastAPI."""
