"""lstmserve.bench: `lstmserve bench`, measuring the server against its transport and compute ceilings."""
