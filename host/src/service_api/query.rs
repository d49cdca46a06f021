//! The DPS query language, as much of it as the SDKs send (wire-protocol.md §8.4):
//! `SELECT * FROM <collection> [WHERE <field> = <string> [AND …]]`, strings delimited by
//! single quotes, double quotes or backticks. Anything else is refused with 400.

use crate::error::ServiceError;
use crate::store::EnrollmentColumn;

/// A parsed query: the collection named after FROM and the equality filters.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    pub collection: String,
    pub filters: Vec<(EnrollmentColumn, String)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Text(String),
    Star,
    Equals,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '*' => {
                chars.next();
                tokens.push(Token::Star);
            }
            '=' => {
                chars.next();
                tokens.push(Token::Equals);
            }
            '\'' | '"' | '`' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some(end) if end == c => break,
                        Some(other) => value.push(other),
                        None => return Err(format!("unterminated string starting with {c}")),
                    }
                }
                tokens.push(Token::Text(value));
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$' => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$' {
                        word.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Word(word));
            }
            other => return Err(format!("unexpected character '{other}'")),
        }
    }
    Ok(tokens)
}

fn column(field: &str, allowed_id: &str) -> Option<EnrollmentColumn> {
    let field = field.to_ascii_lowercase();
    Some(match field.as_str() {
        f if f == allowed_id.to_ascii_lowercase() => EnrollmentColumn::Id,
        "provisioningstatus" => EnrollmentColumn::ProvisioningStatus,
        "attestation.type" => EnrollmentColumn::AttestationType,
        "deviceid" => EnrollmentColumn::DeviceId,
        "iothubhostname" => EnrollmentColumn::IotHubHostName,
        "allocationpolicy" => EnrollmentColumn::AllocationPolicy,
        _ => return None,
    })
}

/// Parses `text`; `id_field` is `registrationId` or `enrollmentGroupId`.
pub fn parse(text: &str, id_field: &str) -> Result<Query, ServiceError> {
    let bad =
        |why: String| ServiceError::invalid(format!("query '{text}' is not supported: {why}"));
    if text.len() > 4096 {
        return Err(ServiceError::invalid(
            "the query is longer than 4096 characters",
        ));
    }
    let tokens = tokenize(text).map_err(bad)?;
    let mut it = tokens.into_iter();
    let keyword = |token: Option<Token>, word: &str| matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(word));
    if !keyword(it.next(), "select")
        || it.next() != Some(Token::Star)
        || !keyword(it.next(), "from")
    {
        return Err(bad("it must start with SELECT * FROM".to_owned()));
    }
    let Some(Token::Word(collection)) = it.next() else {
        return Err(bad("FROM must name a collection".to_owned()));
    };
    let mut filters = Vec::new();
    match it.next() {
        None => {
            return Ok(Query {
                collection,
                filters,
            })
        }
        Some(Token::Word(w)) if w.eq_ignore_ascii_case("where") => {}
        Some(_) => return Err(bad("only WHERE may follow the collection".to_owned())),
    }
    loop {
        let Some(Token::Word(field)) = it.next() else {
            return Err(bad("WHERE needs a field name".to_owned()));
        };
        let column = column(&field, id_field).ok_or_else(|| {
            bad(format!(
                "field '{field}' cannot be filtered; use {id_field}, deviceId, provisioningStatus, attestation.type, iotHubHostName or allocationPolicy"
            ))
        })?;
        if it.next() != Some(Token::Equals) {
            return Err(bad("only '=' comparisons are supported".to_owned()));
        }
        let Some(Token::Text(value)) = it.next() else {
            return Err(bad("a comparison needs a quoted string value".to_owned()));
        };
        filters.push((column, value));
        match it.next() {
            None => {
                return Ok(Query {
                    collection,
                    filters,
                })
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("and") => {}
            Some(_) => return Err(bad("conditions are joined with AND only".to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_queries_the_sdks_send() {
        let q = parse("SELECT * FROM enrollments", "registrationId").unwrap();
        assert_eq!(q.collection, "enrollments");
        assert!(q.filters.is_empty());
        let q = parse(
            "select * from enrollments where iotHubHostName=`ContosoIoTHub.azure-devices.net`",
            "registrationId",
        )
        .unwrap();
        assert_eq!(
            q.filters,
            vec![(
                EnrollmentColumn::IotHubHostName,
                "ContosoIoTHub.azure-devices.net".to_owned()
            )]
        );
        let q = parse("SELECT * FROM enrollmentGroups WHERE provisioningStatus = 'disabled' AND attestation.type = \"x509\"", "enrollmentGroupId")
            .unwrap();
        assert_eq!(q.filters.len(), 2);
    }

    #[test]
    fn refuses_what_it_cannot_answer() {
        for text in [
            "DELETE FROM enrollments",
            "SELECT registrationId FROM enrollments",
            "SELECT * FROM enrollments WHERE secret = 'x'",
            "SELECT * FROM enrollments WHERE deviceId > 'x'",
            "SELECT * FROM enrollments WHERE deviceId = 'x' OR deviceId = 'y'",
            "SELECT * FROM enrollments WHERE deviceId = 'x",
            "SELECT * FROM enrollments; DROP TABLE enrollments",
        ] {
            let error = parse(text, "registrationId").unwrap_err();
            assert_eq!(error.status(), 400, "{text}");
        }
    }
}
