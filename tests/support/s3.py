"""The S3 test endpoint's credentials and bucket creation (the server itself is a conftest fixture)."""

S3_TEST_ACCESS_KEY = "AKIATESTDINOPLATFORM"
S3_TEST_SECRET_KEY = "test-secret-dino-0123456789abcdef"  # tests assert it never leaks


def create_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on ``endpoint`` (credentials from the environment); return ``s3://name``."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"
