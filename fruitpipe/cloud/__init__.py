"""`fruitpipe emr ...`: run the pipeline on AWS EMR through boto3 (config, cluster requests, costs, audit).

Stands beside the pipeline: nothing here imports pyspark, torch or fruitpipe.pipeline.
"""
