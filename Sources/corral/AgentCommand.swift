import Agent
import ArgumentParser
import Egress
import Foundation
import Libvirt
import Logging
import NIOSSL
import PoolAPI
import PoolController
import ServiceLifecycle
import Support

extension Corral {
    struct AgentCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "agent",
            abstract: "Run the appliance agent, register it with a pool, and show its instances.",
            subcommands: [Run.self, Register.self, Status.self]
        )
    }
}

/// The agent's configuration file: `--config`, else `CORRAL_AGENT_CONFIG`,
/// else `/etc/corral/agent.toml`.
struct AgentConfigOption: ParsableArguments {
    @Option(help: "The agent's configuration file (TOML; see etc/corral/agent.toml).")
    var config: String?

    var path: String { config ?? ProcessInfo.processInfo.environment["CORRAL_AGENT_CONFIG"] ?? "/etc/corral/agent.toml" }

    /// The configuration, or exit 1 with a one-line error.
    func load() -> AgentConfiguration {
        guard FileManager.default.fileExists(atPath: path) else {
            fail("no agent configuration at \(path): write one with `corral agent register --pool URL --token-file FILE --config \(path)` (see etc/corral/agent.toml).")
        }
        do {
            return try AgentConfiguration.load(path: path)
        } catch {
            fail("\(error)")
        }
    }
}

extension Corral.AgentCommand {
    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run the agent until SIGTERM or SIGINT (running VMs are left running).")

        @OptionGroup var config: AgentConfigOption
        @OptionGroup var log: LogOptions

        func run() async throws {
            let configuration = config.load()
            let logger = log.logger("corral.agent")
            let token: String
            do {
                token = try configuration.readToken()
            } catch {
                fail("\(error)")
            }
            let agent: Agent
            do {
                agent = try await Agent.open(configuration: configuration, token: token, logger: logger)
            } catch {
                fail("\(error)")
            }
            logger.info("agent for \(configuration.poolURL) on \(configuration.libvirtURI), state in \(configuration.stateDirectory)")
            let group = ServiceGroup(
                configuration: .init(
                    services: [.init(service: Libvirt.EventLoop.shared), .init(service: agent, successTerminationBehavior: .gracefullyShutdownGroup, failureTerminationBehavior: .gracefullyShutdownGroup)],
                    gracefulShutdownSignals: [.sigterm, .sigint],
                    logger: logger))
            do {
                try await group.run()
            } catch let error as AgentFatalError {
                await agent.close()
                fail("\(error)")
            } catch {
                await agent.close()
                fail("the agent stopped: \(error)")
            }
            await agent.close()
        }
    }

    struct Register: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check an appliance token with the pool and write the agent's configuration file.")

        @OptionGroup var config: AgentConfigOption

        @Option(help: "The pool controller's URL, e.g. http://pool.example.org:8080.")
        var pool: String

        @Option(help: "The file holding the appliance's token (from `corral pool appliance add`), mode 0600.")
        var tokenFile: String

        @Option(help: "The libvirt URI (default qemu:///system, or the existing file's).")
        var uri: String?

        @Option(help: "auto, kvm or qemu (default auto, or the existing file's).")
        var virtType: String?

        @Option(help: "Where the agent keeps its state and instance disks.")
        var stateDir: String?

        @Option(help: "Where the agent caches images.")
        var imageDir: String?

        @Option(help: "With user-mode networking: host ports (on 127.0.0.1) forwarded to guests' SSH, e.g. 22000-22999.")
        var sshForwardPorts: String?

        @Option(
            help: "The pool's public key (base64, from `corral pool signing-key` on the pool); default: fetched from the pool now and pinned.")
        var poolKey: String?

        @Flag(help: "Accept a pool reached over plain http on another host (the token and actions cross the network unencrypted).")
        var insecure = false

        @Option(
            name: .customLong("pool-ca"),
            help: "With an https pool: a PEM file of the CA (or self-signed certificate) the pool's certificate must chain to; copied next to the configuration and pinned (default: the file's pool.ca_file, else the system's trust store).")
        var poolCA: String?

        @Option(
            name: .customLong("image-allow"),
            help: "A network image URLs may reach besides public addresses, e.g. 127.0.0.0/8 for an image server on this host (repeatable; replaces the file's images.allow).")
        var imageAllow: [String] = []

        func validate() throws {
            if let poolKey, ReplySignature.publicKeyBytes(poolKey) == nil {
                throw ValidationError("--pool-key must be the key `corral pool signing-key` prints (base64 of 32 bytes).")
            }
            for network in imageAllow where IPNetwork(network) == nil {
                throw ValidationError("--image-allow must be an address or network such as 127.0.0.0/8 (it was '\(network)').")
            }
            try validateHTTPURL(pool, option: "--pool")
            if let virtType, VirtualizationType(rawValue: virtType) == nil {
                throw ValidationError("--virt-type must be auto, kvm or qemu (it was '\(virtType)').")
            }
            for (option, value) in [("--state-dir", stateDir), ("--image-dir", imageDir), ("--token-file", tokenFile)] {
                if let value, !value.hasPrefix("/") { throw ValidationError("\(option) must be an absolute path (it was '\(value)').") }
            }
        }

        func run() async throws {
            var configuration = AgentConfiguration()
            if FileManager.default.fileExists(atPath: config.path) { configuration = config.load() }
            let previousURL = configuration.poolURL
            configuration.poolURL = pool
            configuration.tokenFile = tokenFile
            if insecure { configuration.insecure = true }
            if !configuration.insecure, let url = URLComponents(string: pool), url.scheme == "http",
                !AgentConfiguration.isLoopback(url.host ?? "")
            {
                fail("--pool \(pool): plain http to another host lets anyone on the path read the token; use https, or pass --insecure")
            }
            if let poolCA {
                // Pinned by copy: the agent trusts what was given now, whatever
                // later happens to the original file.
                let pinned = URL(fileURLWithPath: config.path).deletingLastPathComponent().appendingPathComponent("pool-ca.pem").path
                do {
                    _ = try PoolClient.tlsConfiguration(trusting: poolCA)
                    let pem = try Data(contentsOf: URL(fileURLWithPath: poolCA))
                    try FileManager.default.createDirectory(
                        atPath: URL(fileURLWithPath: pinned).deletingLastPathComponent().path, withIntermediateDirectories: true)
                    if URL(fileURLWithPath: poolCA).standardizedFileURL.path != pinned { try pem.write(to: URL(fileURLWithPath: pinned)) }
                    try FileModes.set(pinned, mode: 0o644)
                } catch {
                    fail("--pool-ca \(poolCA): \(error)")
                }
                configuration.caFile = pinned
            } else if previousURL != pool {
                configuration.caFile = nil
            }
            var tls: TLSConfiguration?
            if let caFile = configuration.caFile {
                do { tls = try PoolClient.tlsConfiguration(trusting: caFile) } catch { fail("pool.ca_file: \(error)") }
            }
            if let uri { configuration.libvirtURI = uri }
            if let virtType { configuration.virtualization = VirtualizationType(rawValue: virtType)! }
            if let stateDir { configuration.stateDirectory = stateDir }
            if let imageDir { configuration.imageDirectory = imageDir }
            if !imageAllow.isEmpty { configuration.images.allow = imageAllow }
            if let sshForwardPorts {
                guard let ports = AgentConfiguration.portRange(sshForwardPorts) else {
                    fail("--ssh-forward-ports must be a range such as 22000-22999 within 1024-65535 (it was '\(sshForwardPorts)')")
                }
                guard case .user = configuration.network else { fail("--ssh-forward-ports needs network mode \"user\"") }
                configuration.network = .user(sshForwardPorts: ports)
            }
            let token: String
            do {
                token = try configuration.readToken()
            } catch let error as ConfigurationError {
                fail(error.reason)
            }
            let client = PoolClient(baseURL: pool, token: token, version: Agent.version, timeout: .seconds(15), tls: tls)
            let identity: AuthorizationResult
            do {
                identity = try await client.authorize()
            } catch PoolClientError.refused(401, _) {
                await client.shutdown()
                fail("the pool at \(pool) does not know this token (401). Check \(tokenFile) against `corral pool appliance add`.")
            } catch PoolClientError.refused(409, let message) {
                await client.shutdown()
                fail("the pool at \(pool) has disabled this appliance (409): \(message)")
            } catch {
                await client.shutdown()
                fail("cannot register with \(pool): \(error)")
            }
            let previousKey = configuration.signingKey
            if let poolKey {
                configuration.signingKey = poolKey
            } else {
                let served: String
                do {
                    served = try await client.poolSigningKey()
                } catch {
                    await client.shutdown()
                    fail("cannot fetch the pool's signing key from \(pool): \(error); pass --pool-key from `corral pool signing-key`")
                }
                guard ReplySignature.publicKeyBytes(served) != nil else {
                    await client.shutdown()
                    fail("the pool at \(pool) served no valid signing key")
                }
                if let previousKey, previousKey != served, previousURL == pool {
                    await client.shutdown()
                    fail(
                        "the pool at \(pool) now signs with another key than \(config.path) pins; if that is expected, pass --pool-key from `corral pool signing-key` on the pool")
                }
                configuration.signingKey = served
            }
            await client.shutdown()
            do {
                let directory = URL(fileURLWithPath: config.path).deletingLastPathComponent()
                try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
                try configuration.rendered().write(toFile: config.path, atomically: true, encoding: .utf8)
            } catch {
                fail("cannot write \(config.path): \(error.localizedDescription)")
            }
            print("registered as appliance '\(identity.name)' of '\(identity.owner)' with \(pool)")
            print("configuration written to \(config.path); start the agent with `corral agent run --config \(config.path)`")
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the agent's instances: pool state, libvirt state, lease and last report.")

        @OptionGroup var config: AgentConfigOption

        @Flag(help: "Print JSON.") var json = false

        @Option(help: "Show when this instance reached each phase of its launch, from the request to SSH.")
        var timeline: String?

        @Flag(help: "Check the agent's health instead: exit 1 when libvirt or the pool does not answer, or a report waited too long.")
        var check = false

        @Option(help: "With --check: the oldest undelivered report may be this many seconds old (1 to 86400).")
        var maxOutboxAge = 300

        func validate() throws {
            guard (1...86_400).contains(maxOutboxAge) else {
                throw ValidationError("--max-outbox-age must be from 1 to 86400 seconds (it was \(maxOutboxAge)).")
            }
            if check, timeline != nil { throw ValidationError("--check and --timeline do not go together.") }
        }

        struct Row: Encodable {
            var name: String
            var phase: String
            var poolState: String
            var libvirtState: String
            var leaseExpires: Date?
            var reportedAt: Date?
            var sshPort: Int?
            var error: String?
        }

        func run() async throws {
            let configuration = config.load()
            let path = "\(configuration.stateDirectory)/agent.sqlite"
            guard FileManager.default.fileExists(atPath: path) else {
                fail("no agent state at \(path): the agent has not run with this configuration yet.")
            }
            let store = try AgentStore(path: path)
            if check {
                let problems = await AgentHealth.check(configuration: configuration, store: store, maxOutboxAge: maxOutboxAge)
                if !problems.isEmpty { throw ExitCode(1) }
                return
            }
            if let timeline {
                guard try await store.instance(named: timeline) != nil else {
                    fail("this agent has no instance '\(timeline)'; `corral agent status` lists them.")
                }
                let entries = ServerTimelineEntry.entries(try await store.timeline(of: timeline))
                if json { return try printJSON(entries) }
                return printTimeline(entries)
            }
            let instances = try await store.instances()
            let pending = try await store.pending()
            var libvirtStates: [String: String] = [:]
            if let connection = try? await Connection.open(configuration.libvirtURI, readOnly: true, keepAlive: nil) {
                for instance in instances {
                    guard let uuid = UUID(uuidString: instance.uuid) else { continue }
                    libvirtStates[instance.name] = (try? await connection.domain(uuid: uuid).state().description) ?? "no domain"
                }
                await connection.close()
            }
            let rows = instances.map { instance in
                Row(
                    name: instance.name, phase: instance.phase.rawValue, poolState: "\(instance.state.rawValue) \(instance.state)",
                    libvirtState: libvirtStates[instance.name] ?? "unknown", leaseExpires: instance.expires,
                    reportedAt: instance.reportedAt, sshPort: instance.sshPort, error: instance.lastError)
            }
            if json {
                try printJSON(rows)
                return
            }
            func date(_ value: Date?) -> String { value.map { $0.formatted(.iso8601) } ?? "-" }
            var table = Table(header: ["NAME", "PHASE", "POOL STATE", "LIBVIRT", "LEASE EXPIRES", "LAST REPORT", "SSH", "ERROR"])
            for row in rows {
                table.rows.append([
                    row.name, row.phase, row.poolState, row.libvirtState, date(row.leaseExpires), date(row.reportedAt),
                    row.sshPort.map { "127.0.0.1:\($0)" } ?? "-", row.error ?? "-",
                ])
            }
            print(table.render())
            if !pending.isEmpty { print("\(pending.count) report(s) waiting for the pool") }
        }
    }
}
