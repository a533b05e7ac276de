//! The real S3 store works with our S3 client: put, list by prefix and
//! delimiter, get, and a wrong secret is refused.

mod common;

use aws_sdk_s3::primitives::ByteStream;

#[tokio::test]
async fn put_list_get_and_wrong_secret_is_rejected() {
    let s3 = common::s3_client().await;
    let bucket = common::bucket();
    let prefix = common::unique("smoke");
    for version in ["100", "200"] {
        for file in ["model.pt", "model.json"] {
            s3.put_object()
                .bucket(&bucket)
                .key(format!("{prefix}/versions/{version}/{file}"))
                .body(ByteStream::from(format!("{version}/{file}").into_bytes()))
                .send()
                .await
                .expect("put");
        }
    }
    let listing = s3
        .list_objects_v2()
        .bucket(&bucket)
        .prefix(format!("{prefix}/versions/"))
        .delimiter("/")
        .send()
        .await
        .expect("list");
    let mut folders: Vec<String> =
        listing.common_prefixes().iter().filter_map(|p| p.prefix().map(str::to_string)).collect();
    folders.sort();
    assert_eq!(folders, vec![format!("{prefix}/versions/100/"), format!("{prefix}/versions/200/")]);

    let body = s3
        .get_object()
        .bucket(&bucket)
        .key(format!("{prefix}/versions/200/model.json"))
        .send()
        .await
        .expect("get")
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(&body[..], b"200/model.json");

    let shared = aws_config::load_from_env().await;
    let wrong = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
            "0000000000000000000000000000000000000000000000000000000000000000",
            None,
            None,
            "wrong-secret-test",
        ))
        .build();
    let err = aws_sdk_s3::Client::from_conf(wrong)
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .expect_err("a wrong secret must be refused");
    let status = err.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(403), "{err:?}");
}
