//! What a handler, an exec program and the access log learn about a TLS session.

use std::io;

use rustls::{CommonState, ProtocolVersion};

/// The negotiated parameters of one TLS connection, taken when its handshake finished.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub protocol: String,
    /// The IANA cipher suite name, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// The name the client asked for (SNI), if any.
    pub server_name: Option<String>,
    /// The ALPN protocol agreed on, if any.
    pub alpn: Option<String>,
    /// The client certificate (leaf) as DER, when one was presented (and so verified).
    pub client_cert: Option<Vec<u8>>,
    /// Its subject distinguished name (`CN=a, O=b`).
    pub client_subject: Option<String>,
    /// Its issuer's distinguished name.
    pub client_issuer: Option<String>,
}

impl TlsInfo {
    /// Read the parameters from a connection whose handshake is complete.
    pub fn from_state(state: &CommonState, server_name: Option<&str>) -> TlsInfo {
        let protocol = match state.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => String::new(),
        };
        let cipher = state
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .map(|s| s.replacen("TLS13_", "TLS_", 1))
            .unwrap_or_default();
        let leaf = state
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let names = leaf.as_deref().and_then(super::load::subject_and_issuer);
        TlsInfo {
            protocol,
            cipher,
            server_name: server_name.map(str::to_string),
            alpn: state
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            client_subject: names.as_ref().map(|(s, _)| s.clone()),
            client_issuer: names.map(|(_, i)| i),
            client_cert: leaf,
        }
    }

    /// The environment stunnel and web servers give a program: `SSL_PROTOCOL`, `SSL_CIPHER`,
    /// `SSL_SERVER_NAME`, `SSL_ALPN`, and for a client certificate `SSL_CLIENT_S_DN`,
    /// `SSL_CLIENT_I_DN`, `SSL_CLIENT_CERT` (PEM); `SSL_CLIENT_VERIFY` is `SUCCESS` or `NONE`.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("SSL_PROTOCOL".to_string(), self.protocol.clone()),
            ("SSL_CIPHER".to_string(), self.cipher.clone()),
        ];
        if let Some(n) = &self.server_name {
            vars.push(("SSL_SERVER_NAME".into(), n.clone()));
        }
        if let Some(a) = &self.alpn {
            vars.push(("SSL_ALPN".into(), a.clone()));
        }
        match &self.client_cert {
            Some(der) => {
                if let Some(s) = &self.client_subject {
                    vars.push(("SSL_CLIENT_S_DN".into(), s.clone()));
                }
                if let Some(i) = &self.client_issuer {
                    vars.push(("SSL_CLIENT_I_DN".into(), i.clone()));
                }
                vars.push(("SSL_CLIENT_CERT".into(), super::load::to_pem(der)));
                vars.push(("SSL_CLIENT_VERIFY".into(), "SUCCESS".into()));
            }
            None => vars.push(("SSL_CLIENT_VERIFY".into(), "NONE".into())),
        }
        vars
    }

    /// The access log's addition: ` tls=TLSv1.3 cipher=… sni=… client="CN=…"`.
    pub fn log_fields(&self) -> String {
        let mut s = format!(" tls={} cipher={}", self.protocol, self.cipher);
        if let Some(n) = &self.server_name {
            s.push_str(&format!(" sni={n}"));
        }
        if let Some(a) = &self.alpn {
            s.push_str(&format!(" alpn={a}"));
        }
        if let Some(c) = &self.client_subject {
            s.push_str(&format!(" client={c:?}"));
        }
        s
    }

    /// One line of TOML, to cross to a forked child in the job's data.
    pub fn encode(&self) -> Vec<u8> {
        toml::to_string(self).unwrap_or_default().into_bytes()
    }

    /// The `SSL_*` variables of a forked stream job whose data carries a session's
    /// parameters (none for a plain connection, whose job data is empty).
    pub fn env_from_job(data: &[u8]) -> Vec<(String, String)> {
        match data.is_empty() {
            true => Vec::new(),
            false => TlsInfo::decode(data).map(|i| i.env()).unwrap_or_default(),
        }
    }

    /// The inverse of `encode`.
    pub fn decode(bytes: &[u8]) -> io::Result<TlsInfo> {
        let text = std::str::from_utf8(bytes).map_err(io::Error::other)?;
        toml::from_str(text).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_encoding() {
        let info = TlsInfo {
            protocol: "TLSv1.3".into(),
            cipher: "TLS_AES_128_GCM_SHA256".into(),
            server_name: Some("a.example".into()),
            alpn: None,
            client_cert: Some(vec![1, 2, 3]),
            client_subject: Some("CN=client".into()),
            client_issuer: Some("CN=ca".into()),
        };
        let env = info.env();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SSL_SERVER_NAME"), Some("a.example"));
        assert_eq!(get("SSL_CLIENT_VERIFY"), Some("SUCCESS"));
        assert_eq!(get("SSL_ALPN"), None);
        assert!(get("SSL_CLIENT_CERT").is_some_and(|p| p.starts_with("-----BEGIN")));
        assert_eq!(TlsInfo::decode(&info.encode()).expect("round trip"), info);
        let none = TlsInfo::default();
        assert_eq!(TlsInfo::decode(&none.encode()).expect("round trip"), none);
    }
}
