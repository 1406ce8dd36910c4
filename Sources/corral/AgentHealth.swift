import Agent
import Foundation
import Libvirt
import NIOSSL
import Support

/// `corral agent status --check`: what a supervisor or a monitoring probe
/// asks of an appliance. Each check prints one line, `ok NAME: ...` or
/// `FAIL NAME: ...`; the problems are returned.
enum AgentHealth {
    static func check(configuration: AgentConfiguration, store: AgentStore, maxOutboxAge: Int) async -> [String] {
        var problems: [String] = []
        func line(_ name: String, _ problem: String?, ok: String) {
            if let problem {
                problems.append(problem)
                print("FAIL \(name): \(problem)")
            } else {
                print("ok \(name): \(ok)")
            }
        }
        // libvirt: its daemon answers on the configured URI.
        do {
            let connection = try await Connection.open(configuration.libvirtURI, readOnly: true, keepAlive: nil)
            let version = try? await connection.libvirtVersion()
            await connection.close()
            line("libvirt", nil, ok: "\(configuration.libvirtURI) answers" + (version.map { " (libvirt \($0))" } ?? ""))
        } catch {
            let reason = (error as? LibvirtError)?.message ?? "\(error)"
            line("libvirt", "\(configuration.libvirtURI) does not answer: \(reason)", ok: "")
        }
        // The pool: it answers and knows this appliance's token.
        let (poolProblem, answered) = await poolProblem(configuration)
        line("pool", poolProblem, ok: "\(answered) accepts this appliance's token")
        // The outbox: reports the pool has not taken yet.
        do {
            let pending = try await store.pending(limit: 1000)
            if let oldest = pending.first {
                let age = Int(Date().timeIntervalSince(oldest.createdAt))
                line(
                    "outbox", age > maxOutboxAge ? "\(pending.count) reports undelivered, the oldest \(age) s old (more than \(maxOutboxAge) s)" : nil,
                    ok: "\(pending.count) reports waiting, the oldest \(age) s old")
            } else {
                line("outbox", nil, ok: "empty")
            }
        } catch {
            line("outbox", "the agent's state cannot be read: \(error)", ok: "")
        }
        return problems
    }

    /// Why the pool cannot be used by this agent (nil when it can), and
    /// the pool URL that answered (a fallback replica when the first did not).
    static func poolProblem(_ configuration: AgentConfiguration) async -> (String?, String) {
        let token: String
        do {
            token = try configuration.readToken()
        } catch let error as ConfigurationError {
            return (error.reason, configuration.poolURL)
        } catch {
            return ("\(error)", configuration.poolURL)
        }
        var tls: TLSConfiguration?
        if let caFile = configuration.caFile {
            do { tls = try PoolClient.tlsConfiguration(trusting: caFile) } catch { return ("pool.ca_file: \(error)", configuration.poolURL) }
        }
        let client = PoolClient(
            baseURL: configuration.poolURL, fallbackURLs: configuration.fallbackPoolURLs, token: token, version: Agent.version,
            timeout: .seconds(10), tls: tls)
        defer { Task { await client.shutdown() } }
        do {
            _ = try await client.authorize()
            return (nil, client.baseURL)
        } catch PoolClientError.refused(let status, let message) {
            return ("\(client.baseURL) refused this appliance (\(status)): \(message.prefix(200))", client.baseURL)
        } catch {
            let urls = client.baseURLs.joined(separator: " or ")
            return ("\(urls) \(client.baseURLs.count > 1 ? "do" : "does") not answer: \(error)", client.baseURL)
        }
    }
}
