"""The database: schema, every SQL statement, migrations, retries and lease identity."""
