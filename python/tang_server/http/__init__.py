"""HTTP: the route table, the application's answers, uvicorn's protocol with its limits and the direct path."""
