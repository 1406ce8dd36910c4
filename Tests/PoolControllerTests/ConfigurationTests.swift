import Foundation
import Testing
import TestSupport

@testable import PoolController

@Suite("Pool configuration file")
struct ConfigurationTests {
    @Test("the shipped etc/corral/pool.toml parses to the built-in defaults")
    func shippedExample() throws {
        let path = Paths.packageRoot.appendingPathComponent("etc/corral/pool.toml").path
        #expect(try PoolConfiguration.load(path: path) == PoolConfiguration())
    }

    @Test("every key is read; absent keys keep their defaults")
    func keys() throws {
        let configuration = try PoolConfiguration.parse(
            """
            [server]
            host = "::1"
            port = 9000
            public_url = "https://pool.example.org"
            [database]
            path = "/srv/pool.sqlite"
            [callbacks]
            timeout_seconds = 2
            max_hops = 3
            allow = ["127.0.0.0/8", "fd00::/8", "192.0.2.7"]
            [housekeeping]
            offer_stale_seconds = 60
            """)
        #expect(configuration.host == "::1")
        #expect(configuration.port == 9000)
        #expect(configuration.publicURL == "https://pool.example.org")
        #expect(configuration.database == "/srv/pool.sqlite")
        #expect(configuration.callbacks.timeoutSeconds == 2)
        #expect(configuration.callbacks.maxHops == 3)
        #expect(configuration.callbacks.maxBytes == 65536)
        #expect(configuration.callbacks.allow == ["127.0.0.0/8", "fd00::/8", "192.0.2.7"])
        #expect(configuration.housekeeping.offerStaleSeconds == 60)
        #expect(configuration.housekeeping.purgeAfterSeconds == 86_400)
        #expect(configuration.reservationSeconds == 600)
    }

    @Test("mistakes are errors naming the key and the fix")
    func mistakes() throws {
        let cases: [(String, String)] = [
            ("[server]\nprot = 1", "pool.toml: server.prot: unknown key; [server] takes host, idle_timeout_seconds, max_connections, port, public_url"),
            ("[sever]\nport = 1", "pool.toml: [sever]: unknown section"),
            ("[server]\nport = \"80\"", "pool.toml: server.port: must be an integer"),
            ("[server]\nport = 70000", "pool.toml: server.port: must be between 0 and 65535 (it is 70000)"),
            ("[callbacks]\nmax_hops = 8", "pool.toml: callbacks.max_hops: must be between 1 and 7 (it is 8)"),
            ("[callbacks]\nallow = \"10.0.0.0/8\"", "pool.toml: callbacks.allow: must be an array of strings"),
            ("[callbacks]\nallow = [\"10.0.0.0/33\"]", "pool.toml: callbacks.allow: '10.0.0.0/33' is not an address or network"),
            ("port = 1", "pool.toml: port: keys belong in a section such as [server]"),
            ("[server\nport = 1", "pool.toml: not valid TOML at line 1"),
        ]
        for (text, message) in cases {
            let error = #expect(throws: PoolError.self, "\(text)") { try PoolConfiguration.parse(text, source: "pool.toml") }
            #expect(error.map { "\($0)".hasPrefix(message) } == true, "\(error.map { "\($0)" } ?? "no error") for \(text)")
        }
    }
}
